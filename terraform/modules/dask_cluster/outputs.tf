output "scheduler_address" {
  description = "Address Dask clients connect to (tcp://IP:PORT)."
  value       = local.scheduler_address
}

output "dashboard_url" {
  description = "The scheduler's dashboard, inside the network (reach it with ssh -L through the bastion)."
  value       = "http://${local.scheduler_ip}:${var.ports.dashboard}/status"
}

output "worker_ips" {
  description = "Private addresses of the workers."
  value       = [for p in openstack_networking_port_v2.worker : p.all_fixed_ips[0]]
}
