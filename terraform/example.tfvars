# An example deployment on an IRIS (OpenStack) project. Copy to prod.tfvars and edit; no secrets here:
# OpenStack credentials come from clouds.yaml (os_cloud), the S3 credential is made by Terraform (or given
# with TF_VAR_s3_access_key / TF_VAR_s3_secret_key in the environment).
os_cloud              = "iris-dac"
name_prefix           = "dac"
external_network_name = "External"
network_cidr          = "10.42.0.0/24"
dns_nameservers       = [] # the cloud's DHCP default

admin_cidrs   = ["192.0.2.0/24"] # your institute's network (a documentation range here)
client_cidrs  = ["0.0.0.0/0"]
metrics_cidrs = []
key_pair      = "dac-admin"

image_name              = "debian-12-generic-amd64"
bastion_flavor          = "l3.nano" # flavor names are per cloud: openstack flavor list
api_flavor              = "l3.medium"
api_count               = 2
api_workers             = 4
api_boot_volume_gb      = 200
dask_scheduler_flavor   = "l3.small"
dask_worker_flavor      = "l3.xlarge"
dask_worker_count       = 4
dask_threads_per_worker = 8

s3_endpoint_url = "https://s3.example.ac.uk" # the cloud's Ceph RGW
bucket_name     = "dac-lake"
lake_prefix     = "prod"
create_bucket   = true

package_spec       = "dac-lake @ https://github.com/example-org/dac-lake/releases/download/v0.1.0/dac_lake-0.1.0-py3-none-any.whl"
extra_pip_packages = ["distributed==2026.8.0", "bokeh>=3.1"]

public_hostname    = "tap.example.ac.uk"
tls_container_ref  = "https://barbican.example.ac.uk:9311/v1/containers/00000000-0000-0000-0000-000000000000"
lb_timeout_seconds = 900

service_config_toml = <<-EOT
  [service]
  sync_timeout_s = 60
  async_workers = 2
  memory_limit = "8GB"
  threads = 4
  maxrec_max = 10000000

  [auth]
  allow_anonymous = true
  jwks_url = "https://login.example.ac.uk/.well-known/jwks.json"
  issuer = "https://login.example.ac.uk"
  audience = "dac-lake"
EOT
