# The API nodes (dac serve under systemd, installed by cloud-init) behind an Octavia load balancer:
# HTTPS terminated on the load balancer (HTTP redirects to it) or plain HTTP without a certificate; a
# health monitor on /health takes a node out when its service or its view of the lake fails; /metrics is
# refused on the public side (Prometheus scrapes the nodes inside); async jobs live on the node that took
# them, so a client sticks to one node (source-IP persistence).

data "openstack_images_image_v2" "image" {
  name        = var.image_name
  most_recent = true
}

resource "openstack_compute_servergroup_v2" "api" {
  name     = "${var.name_prefix}-api"
  policies = ["soft-anti-affinity"]
}

resource "openstack_networking_port_v2" "api" {
  count              = var.node_count
  name               = "${var.name_prefix}-api-${count.index}"
  network_id         = var.network_id
  security_group_ids = var.node_security_group_ids

  fixed_ip {
    subnet_id = var.subnet_id
  }
}

resource "openstack_compute_instance_v2" "api" {
  count       = var.node_count
  name        = "${var.name_prefix}-api-${count.index}"
  flavor_name = var.flavor
  image_id    = data.openstack_images_image_v2.image.id
  key_pair    = var.key_pair
  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    install_script      = var.install_script
    service_unit        = var.service_unit
    service_config_toml = var.service_config_toml
    environment         = var.environment
  })
  metadata = {
    role = "api"
  }

  dynamic "block_device" {
    for_each = var.boot_volume_gb > 0 ? [var.boot_volume_gb] : []
    content {
      uuid                  = data.openstack_images_image_v2.image.id
      source_type           = "image"
      destination_type      = "volume"
      volume_size           = block_device.value
      boot_index            = 0
      delete_on_termination = true
    }
  }

  network {
    port = openstack_networking_port_v2.api[count.index].id
  }

  scheduler_hints {
    group = openstack_compute_servergroup_v2.api.id
  }

  lifecycle {
    # a new package version is rolled out node by node (docs/OPERATIONS.md), not by replacing instances
    ignore_changes = [user_data, image_id]
  }
}

resource "openstack_lb_loadbalancer_v2" "tap" {
  name               = "${var.name_prefix}-tap"
  vip_subnet_id      = var.subnet_id
  security_group_ids = var.lb_security_group_ids
}

resource "openstack_networking_floatingip_associate_v2" "tap" {
  floating_ip = var.floating_ip
  port_id     = openstack_lb_loadbalancer_v2.tap.vip_port_id
}

resource "openstack_lb_pool_v2" "api" {
  name            = "${var.name_prefix}-api"
  loadbalancer_id = openstack_lb_loadbalancer_v2.tap.id
  protocol        = "HTTP"
  # queries differ in cost by orders of magnitude: send new ones to the least busy node
  lb_method = "LEAST_CONNECTIONS"

  persistence {
    type = "SOURCE_IP"
  }
}

resource "openstack_lb_monitor_v2" "health" {
  name           = "${var.name_prefix}-health"
  pool_id        = openstack_lb_pool_v2.api.id
  type           = "HTTP"
  http_method    = "GET"
  url_path       = "/health"
  expected_codes = "200"
  delay          = 10
  timeout        = 5
  max_retries    = 3
}

resource "openstack_lb_member_v2" "api" {
  count         = var.node_count
  name          = "${var.name_prefix}-api-${count.index}"
  pool_id       = openstack_lb_pool_v2.api.id
  subnet_id     = var.subnet_id
  address       = openstack_networking_port_v2.api[count.index].all_fixed_ips[0]
  protocol_port = var.api_port
}

locals {
  https   = var.tls_container_ref != null
  timeout = var.lb_timeout_seconds * 1000
  forwarded = {
    "X-Forwarded-For"   = "true"
    "X-Forwarded-Port"  = "true"
    "X-Forwarded-Proto" = "true"
  }
}

resource "openstack_lb_listener_v2" "https" {
  count                     = local.https ? 1 : 0
  name                      = "${var.name_prefix}-https"
  loadbalancer_id           = openstack_lb_loadbalancer_v2.tap.id
  protocol                  = "TERMINATED_HTTPS"
  protocol_port             = 443
  default_tls_container_ref = var.tls_container_ref
  default_pool_id           = openstack_lb_pool_v2.api.id
  timeout_client_data       = local.timeout
  timeout_member_data       = local.timeout
  insert_headers            = local.forwarded
}

resource "openstack_lb_listener_v2" "http" {
  name                = "${var.name_prefix}-http"
  loadbalancer_id     = openstack_lb_loadbalancer_v2.tap.id
  protocol            = "HTTP"
  protocol_port       = 80
  default_pool_id     = openstack_lb_pool_v2.api.id
  timeout_client_data = local.timeout
  timeout_member_data = local.timeout
  insert_headers      = local.forwarded
}

# /metrics is for Prometheus inside the network, not for the world
resource "openstack_lb_l7policy_v2" "no_metrics" {
  for_each = merge(
    { http = openstack_lb_listener_v2.http.id },
    { for listener in openstack_lb_listener_v2.https : "https" => listener.id },
  )
  name        = "${var.name_prefix}-no-metrics-${each.key}"
  listener_id = each.value
  action      = "REJECT"
  position    = 1
}

resource "openstack_lb_l7rule_v2" "no_metrics" {
  for_each     = openstack_lb_l7policy_v2.no_metrics
  l7policy_id  = each.value.id
  type         = "PATH"
  compare_type = "STARTS_WITH"
  value        = "/metrics"
}

# with a certificate, plain HTTP answers with a redirect to HTTPS (path and query kept)
resource "openstack_lb_l7policy_v2" "to_https" {
  count           = local.https ? 1 : 0
  name            = "${var.name_prefix}-to-https"
  listener_id     = openstack_lb_listener_v2.http.id
  action          = "REDIRECT_PREFIX"
  redirect_prefix = "https://${var.public_host}"
  position        = 2
}

resource "openstack_lb_l7rule_v2" "to_https" {
  count        = local.https ? 1 : 0
  l7policy_id  = openstack_lb_l7policy_v2.to_https[0].id
  type         = "PATH"
  compare_type = "STARTS_WITH"
  value        = "/"
}
