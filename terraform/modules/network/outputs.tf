output "network_id" {
  description = "ID of the private network."
  value       = openstack_networking_network_v2.this.id
}

output "subnet_id" {
  description = "ID of the private subnet (ports, load balancer VIP and members)."
  # instances created before the router interface would boot without a route out (pip install)
  value      = openstack_networking_subnet_v2.this.id
  depends_on = [openstack_networking_router_interface_v2.this]
}

output "subnet_cidr" {
  description = "CIDR of the private subnet."
  value       = openstack_networking_subnet_v2.this.cidr
}

output "external_network_id" {
  description = "ID of the external network."
  value       = data.openstack_networking_network_v2.external.id
}
