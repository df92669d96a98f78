output "bucket" {
  description = "Name of the bucket."
  value       = minio_s3_bucket.lake.bucket
}
