# dac-lake on an OpenStack project (the IRIS cloud) with the lake on the cloud's Ceph RGW:
#
#   clients ──https──> Octavia LB (floating IP) ──> API nodes: dac serve (api_count) ──> Ceph RGW (S3 lake)
#                                                        └── tcp 8786 ──> Dask scheduler ──> Dask workers ──┘
#   admins ──ssh──> bastion (floating IP) ──ssh──> every node
#
# Modules: network (network, subnet, router), security (security groups), bastion, lake_credentials (EC2
# credential for the RGW), lake_bucket (the bucket), dask_cluster (scheduler + workers), api_cluster (API
# nodes + load balancer with its health monitor on /health). See README.md.

locals {
  rgw_host = regex("^https?://([^/]+)", var.s3_endpoint_url)[0]
  rgw_ssl  = can(regex("^https://", var.s3_endpoint_url))

  s3_access_key = var.s3_access_key != null ? var.s3_access_key : one(module.lake_credentials[*].access_key)
  s3_secret_key = var.s3_secret_key != null ? var.s3_secret_key : one(module.lake_credentials[*].secret_key)

  lake_url    = var.lake_prefix == "" ? "s3://${var.bucket_name}" : "s3://${var.bucket_name}/${var.lake_prefix}"
  public_host = var.public_hostname != null ? var.public_hostname : openstack_networking_floatingip_v2.tap.address
  service_url = "${var.tls_container_ref != null ? "https" : "http"}://${local.public_host}"

  # What every node that reads the lake needs (the API nodes and the Dask workers); the two keys only when
  # Terraform delivers them (else the operator writes them into /etc/dac-lake/dac.env).
  lake_environment = merge(
    {
      DAC_LAKE_URL        = local.lake_url
      DAC_S3_ENDPOINT_URL = var.s3_endpoint_url
      DAC_S3_REGION       = var.s3_region
      DAC_S3_PATH_STYLE   = "true"
    },
    var.deliver_lake_credentials ? {
      DAC_S3_ACCESS_KEY_ID     = local.s3_access_key
      DAC_S3_SECRET_ACCESS_KEY = local.s3_secret_key
    } : {},
    var.extra_environment,
  )

  install_script = templatefile("${path.module}/templates/install.sh.tftpl", {
    package_spec       = var.package_spec
    extra_pip_packages = var.extra_pip_packages
    pip_index_url      = var.pip_index_url == null ? "" : var.pip_index_url
  })

  # the systemd units are the ones in deploy/ (one definition for Terraform, hand installs and docs)
  units = {
    api            = file("${path.module}/../deploy/dac-serve.service")
    dask_scheduler = file("${path.module}/../deploy/dask-scheduler.service")
    dask_worker    = file("${path.module}/../deploy/dask-worker.service")
  }
}

module "network" {
  source = "./modules/network"

  name_prefix           = var.name_prefix
  cidr                  = var.network_cidr
  dns_nameservers       = var.dns_nameservers
  external_network_name = var.external_network_name
}

module "security" {
  source = "./modules/security"

  name_prefix   = var.name_prefix
  subnet_cidr   = module.network.subnet_cidr
  admin_cidrs   = var.admin_cidrs
  client_cidrs  = var.client_cidrs
  metrics_cidrs = var.metrics_cidrs
  api_port      = var.api_port
  https         = var.tls_container_ref != null
  dask_ports    = local.dask_ports
}

# The TAP service's public address, made here so that the API nodes' settings (public_url) can name it
# before the load balancer exists.
resource "openstack_networking_floatingip_v2" "tap" {
  pool        = var.external_network_name
  description = "${var.name_prefix}: TAP service (load balancer)"
}

module "bastion" {
  source = "./modules/bastion"

  name_prefix           = var.name_prefix
  flavor                = var.bastion_flavor
  image_name            = var.image_name
  key_pair              = var.key_pair
  network_id            = module.network.network_id
  subnet_id             = module.network.subnet_id
  security_group_ids    = [module.security.bastion_id]
  external_network_name = var.external_network_name
}

module "lake_credentials" {
  source = "./modules/lake_credentials"
  count  = var.s3_access_key == null ? 1 : 0
}

module "lake_bucket" {
  source = "./modules/lake_bucket"
  count  = var.create_bucket ? 1 : 0

  bucket_name = var.bucket_name
}

locals {
  dask_ports = {
    scheduler = 8786
    dashboard = 8787
    workers   = "9000:9049"
    nannies   = "9050:9099"
    range_min = 9000
    range_max = 9099
  }
}

module "dask" {
  source = "./modules/dask_cluster"

  name_prefix        = var.name_prefix
  scheduler_flavor   = var.dask_scheduler_flavor
  worker_flavor      = var.dask_worker_flavor
  worker_count       = var.dask_worker_count
  threads_per_worker = var.dask_threads_per_worker
  image_name         = var.image_name
  key_pair           = var.key_pair
  network_id         = module.network.network_id
  subnet_id          = module.network.subnet_id
  security_group_ids = [module.security.nodes_id, module.security.dask_id]
  ports              = local.dask_ports
  install_script     = local.install_script
  lake_environment   = local.lake_environment
  scheduler_unit     = local.units.dask_scheduler
  worker_unit        = local.units.dask_worker
}

module "api" {
  source = "./modules/api_cluster"

  name_prefix             = var.name_prefix
  node_count              = var.api_count
  flavor                  = var.api_flavor
  image_name              = var.image_name
  key_pair                = var.key_pair
  boot_volume_gb          = var.api_boot_volume_gb
  network_id              = module.network.network_id
  subnet_id               = module.network.subnet_id
  node_security_group_ids = [module.security.nodes_id, module.security.api_id, module.security.dask_client_id]
  lb_security_group_ids   = [module.security.lb_id]
  api_port                = var.api_port
  floating_ip             = openstack_networking_floatingip_v2.tap.address
  public_host             = local.public_host
  tls_container_ref       = var.tls_container_ref
  lb_timeout_seconds      = var.lb_timeout_seconds
  install_script          = local.install_script
  service_unit            = local.units.api
  service_config_toml     = var.service_config_toml
  environment = merge(local.lake_environment, {
    DAC_HOST               = "0.0.0.0"
    DAC_PORT               = tostring(var.api_port)
    DAC_WORKERS            = tostring(var.api_workers)
    DAC_SERVICE_PUBLIC_URL = local.service_url
    (var.dask_address_env) = module.dask.scheduler_address
    DAC_INGEST_DASK        = module.dask.scheduler_address
  })
}
