# An EC2-style credential of the user Terraform runs as, in the current project: Ceph RGW's Keystone
# integration accepts it as an S3 access/secret key pair for the project's buckets. Run Terraform as a
# service user (or an application credential's user) rather than a person: the lake must not depend on
# someone's account. The secret lives in the Terraform state only; protect the state (see README.md).

resource "openstack_identity_ec2_credential_v3" "lake" {
  project_id = var.project_id
}
