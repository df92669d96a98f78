output "private_ips" {
  description = "Private addresses of the API nodes (Prometheus targets: http://IP:api_port/metrics)."
  value       = [for p in openstack_networking_port_v2.api : p.all_fixed_ips[0]]
}

output "loadbalancer_vip" {
  description = "Private VIP of the load balancer."
  value       = openstack_lb_loadbalancer_v2.tap.vip_address
}

output "pool_id" {
  description = "ID of the load balancer pool (to drain a node: openstack loadbalancer member set --weight 0)."
  value       = openstack_lb_pool_v2.api.id
}
