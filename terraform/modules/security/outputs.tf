output "bastion_id" {
  description = "Security group of the bastion."
  value       = openstack_networking_secgroup_v2.bastion.id
}

output "nodes_id" {
  description = "Security group of every instance (SSH from the bastion)."
  value       = openstack_networking_secgroup_v2.nodes.id
}

output "api_id" {
  description = "Security group of the API nodes."
  value       = openstack_networking_secgroup_v2.api.id
}

output "lb_id" {
  description = "Security group of the load balancer's VIP port."
  value       = openstack_networking_secgroup_v2.lb.id
}

output "dask_id" {
  description = "Security group of the Dask scheduler and workers."
  value       = openstack_networking_secgroup_v2.dask.id
}

output "dask_client_id" {
  description = "Security group of the Dask clients (the API nodes)."
  value       = openstack_networking_secgroup_v2.dask_client.id
}
