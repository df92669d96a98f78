# OpenStack credentials come from clouds.yaml (the entry named by var.os_cloud) or the OS_* variables of an
# openrc / application-credential file: nothing secret is ever written in this directory.
provider "openstack" {
  cloud = var.os_cloud
}

# The lake bucket is made through the RGW's S3 API with the EC2 credential of module.lake_credentials (or the
# one given in var.s3_access_key/var.s3_secret_key). On the first plan that credential does not exist yet:
# if the provider refuses to plan with unknown credentials, apply in two steps (see README.md).
provider "minio" {
  minio_server   = local.rgw_host
  minio_user     = local.s3_access_key
  minio_password = local.s3_secret_key
  minio_ssl      = local.rgw_ssl
  minio_region   = var.s3_region
  s3_compat_mode = true
}
