variable "project_id" {
  description = "Project of the credential (null: the project Terraform is scoped to)."
  type        = string
  default     = null
}
