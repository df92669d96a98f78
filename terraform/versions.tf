terraform {
  # Terraform >= 1.0 or OpenTofu >= 1.6: nothing here needs a newer language feature.
  required_version = ">= 1.0.0"

  required_providers {
    openstack = {
      source  = "terraform-provider-openstack/openstack"
      version = "~> 3.0"
    }
    # The lake bucket on Ceph RGW (S3 API). 3.39 is the first release whose changelog we checked that has
    # s3_compat_mode (skip MinIO-only calls RGW does not implement).
    minio = {
      source  = "aminueza/minio"
      version = ">= 3.39.0, < 4.0.0"
    }
  }
}
