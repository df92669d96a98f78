# The lake's bucket on the Ceph RGW, through its S3 API (the minio provider in s3_compat_mode, configured in
# the root module). Private; never destroyed by Terraform: the catalogs in it outlive any deployment
# (`terraform state rm module.lake_bucket` before a `terraform destroy` of everything else).

resource "minio_s3_bucket" "lake" {
  bucket        = var.bucket_name
  acl           = "private"
  force_destroy = false

  lifecycle {
    prevent_destroy = true
  }
}
