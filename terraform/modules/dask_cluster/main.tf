# A Dask distributed cluster next to the lake: one scheduler and `worker_count` workers (one worker process
# of `threads_per_worker` threads per instance), each under systemd (deploy/dask-*.service). The workers read
# the lake themselves, so they get its URL and S3 keys; the scheduler only routes tasks.

data "openstack_images_image_v2" "image" {
  name        = var.image_name
  most_recent = true
}

resource "openstack_compute_servergroup_v2" "workers" {
  name     = "${var.name_prefix}-dask-workers"
  policies = ["soft-anti-affinity"]
}

# the scheduler's address must be known before the workers (and the API nodes) are configured
resource "openstack_networking_port_v2" "scheduler" {
  name               = "${var.name_prefix}-dask-scheduler"
  network_id         = var.network_id
  security_group_ids = var.security_group_ids

  fixed_ip {
    subnet_id = var.subnet_id
  }
}

locals {
  scheduler_ip      = openstack_networking_port_v2.scheduler.all_fixed_ips[0]
  scheduler_address = "tcp://${local.scheduler_ip}:${var.ports.scheduler}"
}

resource "openstack_compute_instance_v2" "scheduler" {
  name        = "${var.name_prefix}-dask-scheduler"
  flavor_name = var.scheduler_flavor
  image_id    = data.openstack_images_image_v2.image.id
  key_pair    = var.key_pair
  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    role             = "scheduler"
    install_script   = var.install_script
    unit             = var.scheduler_unit
    lake_environment = {}
    dask_environment = {
      DASK_HOST                                  = local.scheduler_ip
      DASK_SCHEDULER_PORT                        = tostring(var.ports.scheduler)
      DASK_DASHBOARD_PORT                        = tostring(var.ports.dashboard)
      DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING = "True"
    }
  })
  metadata = {
    role = "dask-scheduler"
  }

  network {
    port = openstack_networking_port_v2.scheduler.id
  }

  lifecycle {
    ignore_changes = [user_data, image_id]
  }
}

resource "openstack_networking_port_v2" "worker" {
  count              = var.worker_count
  name               = "${var.name_prefix}-dask-worker-${count.index}"
  network_id         = var.network_id
  security_group_ids = var.security_group_ids

  fixed_ip {
    subnet_id = var.subnet_id
  }
}

resource "openstack_compute_instance_v2" "worker" {
  count       = var.worker_count
  name        = "${var.name_prefix}-dask-worker-${count.index}"
  flavor_name = var.worker_flavor
  image_id    = data.openstack_images_image_v2.image.id
  key_pair    = var.key_pair
  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    role             = "worker"
    install_script   = var.install_script
    unit             = var.worker_unit
    lake_environment = var.lake_environment
    dask_environment = {
      DASK_HOST              = openstack_networking_port_v2.worker[count.index].all_fixed_ips[0]
      DASK_SCHEDULER_ADDRESS = local.scheduler_address
      DASK_NTHREADS          = tostring(var.threads_per_worker)
      DASK_MEMORY_LIMIT      = "auto"
      DASK_WORKER_PORTS      = var.ports.workers
      DASK_NANNY_PORTS       = var.ports.nannies
    }
  })
  metadata = {
    role = "dask-worker"
  }

  network {
    port = openstack_networking_port_v2.worker[count.index].id
  }

  scheduler_hints {
    group = openstack_compute_servergroup_v2.workers.id
  }

  lifecycle {
    ignore_changes = [user_data, image_id]
  }
}
