# The SSH bastion: the one instance with SSH from outside (the admin CIDRs); every other node is reached
# through it (ssh -J). It runs nothing else and holds no credentials.

resource "openstack_networking_port_v2" "bastion" {
  name               = "${var.name_prefix}-bastion"
  network_id         = var.network_id
  security_group_ids = var.security_group_ids

  fixed_ip {
    subnet_id = var.subnet_id
  }
}

resource "openstack_compute_instance_v2" "bastion" {
  name        = "${var.name_prefix}-bastion"
  flavor_name = var.flavor
  image_name  = var.image_name
  key_pair    = var.key_pair
  metadata = {
    role = "bastion"
  }

  network {
    port = openstack_networking_port_v2.bastion.id
  }
}

resource "openstack_networking_floatingip_v2" "bastion" {
  pool        = var.external_network_name
  description = "${var.name_prefix}: SSH bastion"
}

resource "openstack_networking_floatingip_associate_v2" "bastion" {
  floating_ip = openstack_networking_floatingip_v2.bastion.address
  port_id     = openstack_networking_port_v2.bastion.id
}
