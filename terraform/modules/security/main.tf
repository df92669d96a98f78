# Security groups: who may talk to whom. New groups keep OpenStack's default allow-all egress (pip, the RGW,
# the identity provider's JWKS); every ingress is listed here.
#   bastion      ssh from the admin CIDRs                   (the only SSH from outside)
#   nodes        ssh from the bastion                      (every instance)
#   api          dac serve's port from the subnet          (load balancer members, health monitor, Prometheus)
#   lb           80/443 from the client CIDRs               (the load balancer's VIP)
#   dask         scheduler/dashboard/worker ports from the Dask nodes themselves and their clients
#   dask_client  marks the API nodes as Dask clients         (no rules of its own)

locals {
  lb_ports = var.https ? [80, 443] : [80]
  lb_rules = { for pair in setproduct(var.client_cidrs, local.lb_ports) : "${pair[0]}:${pair[1]}" => pair }
}

resource "openstack_networking_secgroup_v2" "bastion" {
  name        = "${var.name_prefix}-bastion"
  description = "SSH from the administrators' networks"
}

resource "openstack_networking_secgroup_rule_v2" "bastion_ssh" {
  for_each          = toset(var.admin_cidrs)
  security_group_id = openstack_networking_secgroup_v2.bastion.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 22
  port_range_max    = 22
  remote_ip_prefix  = each.value
}

resource "openstack_networking_secgroup_v2" "nodes" {
  name        = "${var.name_prefix}-nodes"
  description = "SSH from the bastion only"
}

resource "openstack_networking_secgroup_rule_v2" "nodes_ssh" {
  security_group_id = openstack_networking_secgroup_v2.nodes.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 22
  port_range_max    = 22
  remote_group_id   = openstack_networking_secgroup_v2.bastion.id
}

resource "openstack_networking_secgroup_v2" "api" {
  name        = "${var.name_prefix}-api"
  description = "dac serve from the load balancer and Prometheus"
}

resource "openstack_networking_secgroup_rule_v2" "api_from_subnet" {
  security_group_id = openstack_networking_secgroup_v2.api.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = var.api_port
  port_range_max    = var.api_port
  remote_ip_prefix  = var.subnet_cidr
}

resource "openstack_networking_secgroup_rule_v2" "api_metrics" {
  for_each          = toset(var.metrics_cidrs)
  security_group_id = openstack_networking_secgroup_v2.api.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = var.api_port
  port_range_max    = var.api_port
  remote_ip_prefix  = each.value
}

resource "openstack_networking_secgroup_v2" "lb" {
  name        = "${var.name_prefix}-lb"
  description = "HTTP(S) to the TAP service's load balancer"
}

resource "openstack_networking_secgroup_rule_v2" "lb_clients" {
  for_each          = local.lb_rules
  security_group_id = openstack_networking_secgroup_v2.lb.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = each.value[1]
  port_range_max    = each.value[1]
  remote_ip_prefix  = each.value[0]
}

resource "openstack_networking_secgroup_v2" "dask_client" {
  name        = "${var.name_prefix}-dask-client"
  description = "Members may use the Dask cluster (the API nodes)"
}

resource "openstack_networking_secgroup_v2" "dask" {
  name        = "${var.name_prefix}-dask"
  description = "Dask scheduler and workers"
}

locals {
  # (port_min, port_max, from group): the scheduler and the worker/nanny range to the Dask nodes and their
  # clients (a client fetches results from workers directly); the dashboard also to the bastion (ssh -L)
  dask_rules = {
    "scheduler-self"   = [var.dask_ports.scheduler, var.dask_ports.scheduler, openstack_networking_secgroup_v2.dask.id]
    "scheduler-client" = [var.dask_ports.scheduler, var.dask_ports.scheduler, openstack_networking_secgroup_v2.dask_client.id]
    "workers-self"     = [var.dask_ports.range_min, var.dask_ports.range_max, openstack_networking_secgroup_v2.dask.id]
    "workers-client"   = [var.dask_ports.range_min, var.dask_ports.range_max, openstack_networking_secgroup_v2.dask_client.id]
    "dashboard-client" = [var.dask_ports.dashboard, var.dask_ports.dashboard, openstack_networking_secgroup_v2.dask_client.id]
    "dashboard-admin"  = [var.dask_ports.dashboard, var.dask_ports.dashboard, openstack_networking_secgroup_v2.bastion.id]
  }
}

resource "openstack_networking_secgroup_rule_v2" "dask" {
  for_each          = local.dask_rules
  security_group_id = openstack_networking_secgroup_v2.dask.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = each.value[0]
  port_range_max    = each.value[1]
  remote_group_id   = each.value[2]
}
