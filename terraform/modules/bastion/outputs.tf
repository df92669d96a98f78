output "public_ip" {
  description = "Floating IP of the bastion (ssh -J <user>@this)."
  value       = openstack_networking_floatingip_v2.bastion.address
}

output "private_ip" {
  description = "Private address of the bastion."
  value       = openstack_networking_port_v2.bastion.all_fixed_ips[0]
}
