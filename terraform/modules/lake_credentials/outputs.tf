output "access_key" {
  description = "S3 access key of the credential."
  value       = openstack_identity_ec2_credential_v3.lake.access
  sensitive   = true
}

output "secret_key" {
  description = "S3 secret key of the credential."
  value       = openstack_identity_ec2_credential_v3.lake.secret
  sensitive   = true
}
