output "tap_url" {
  description = "The TAP service for TOPCAT, pyvo and STILTS."
  value       = "${local.service_url}/tap"
}

output "service_url" {
  description = "Base URL of the service (/health, /docs, /scs/<catalog>)."
  value       = local.service_url
}

output "tap_floating_ip" {
  description = "Floating IP of the load balancer (point public_hostname's DNS A record here)."
  value       = openstack_networking_floatingip_v2.tap.address
}

output "bastion_ip" {
  description = "Floating IP of the SSH bastion: ssh -J <user>@<bastion_ip> <user>@<node's private IP>."
  value       = module.bastion.public_ip
}

output "api_private_ips" {
  description = "API nodes (Prometheus targets http://IP:api_port/metrics)."
  value       = module.api.private_ips
}

output "dask_scheduler_address" {
  description = "The Dask scheduler, for `dac ingest release ... --dask ADDRESS` run inside the network."
  value       = module.dask.scheduler_address
}

output "dask_dashboard_url" {
  description = "The Dask dashboard inside the network (ssh -L 8787:IP:8787 through the bastion)."
  value       = module.dask.dashboard_url
}

output "dask_worker_ips" {
  description = "Private addresses of the Dask workers."
  value       = module.dask.worker_ips
}

output "bucket" {
  description = "The lake's bucket on the RGW."
  value       = var.bucket_name
}

output "lake_url" {
  description = "The lake URL for DAC_LAKE_URL / --lake."
  value       = local.lake_url
}

output "s3_endpoint_url" {
  description = "The RGW endpoint for DAC_S3_ENDPOINT_URL."
  value       = var.s3_endpoint_url
}

output "s3_access_key" {
  description = "Access key of the lake's credential (terraform output -raw s3_access_key)."
  value       = local.s3_access_key
  sensitive   = true
}

output "s3_secret_key" {
  description = "Secret key of the lake's credential (terraform output -raw s3_secret_key); keep it out of shells' history."
  value       = local.s3_secret_key
  sensitive   = true
}

output "lb_pool_id" {
  description = "The load balancer's pool (drain a node: openstack loadbalancer member set --weight 0 POOL MEMBER)."
  value       = module.api.pool_id
}
