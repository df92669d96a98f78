variable "bucket_name" {
  description = "Name of the lake's bucket."
  type        = string
}
