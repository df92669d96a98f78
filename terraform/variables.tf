# ------------------------------------------------------------------------------------------ the cloud
variable "os_cloud" {
  description = "Entry of clouds.yaml (or OS_CLOUD) with the OpenStack project's credentials; they never go in this directory."
  type        = string
  default     = "openstack"
}

variable "name_prefix" {
  description = "Prefix of every resource name, so that several deployments (prod, test) share a project."
  type        = string
  default     = "dac"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,20}$", var.name_prefix))
    error_message = "The name_prefix must be 1-21 characters: lower-case letters, digits and '-', starting with a letter."
  }
}

variable "external_network_name" {
  description = "The provider network with floating IPs and the router's gateway (on IRIS often \"External\")."
  type        = string

  validation {
    condition     = length(var.external_network_name) > 0
    error_message = "The external_network_name must not be empty."
  }
}

variable "network_cidr" {
  description = "CIDR of the deployment's private subnet (API nodes, Dask scheduler and workers, bastion, load balancer)."
  type        = string
  default     = "10.42.0.0/24"

  validation {
    condition     = can(regex("^[0-9.]+/[0-9]+$", var.network_cidr)) && can(cidrhost(var.network_cidr, 16)) # false below /27
    error_message = "The network_cidr must be an IPv4 CIDR of at least /27, e.g. 10.42.0.0/24."
  }
}

variable "dns_nameservers" {
  description = "DNS servers handed to the instances by DHCP (empty: the cloud's default)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for ip in var.dns_nameservers : can(cidrhost("${ip}/32", 0))])
    error_message = "Each of dns_nameservers must be an IPv4 address."
  }
}

# ------------------------------------------------------------------------------------------ access
variable "admin_cidrs" {
  description = "CIDRs allowed to SSH to the bastion (the only host with SSH from outside). Never 0.0.0.0/0."
  type        = list(string)

  validation {
    condition = length(var.admin_cidrs) > 0 && alltrue([
      for c in var.admin_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"
    ])
    error_message = "The admin_cidrs must be one or more valid CIDRs, and not 0.0.0.0/0."
  }
}

variable "client_cidrs" {
  description = "CIDRs allowed to reach the TAP service on the load balancer (80/443); a public service keeps 0.0.0.0/0."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "The client_cidrs must be one or more valid CIDRs."
  }
}

variable "metrics_cidrs" {
  description = "CIDRs of Prometheus servers outside the private subnet that scrape /metrics on the API nodes directly (the load balancer refuses /metrics)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.metrics_cidrs : can(cidrhost(c, 0))])
    error_message = "Each of metrics_cidrs must be a valid CIDR."
  }
}

variable "key_pair" {
  description = "Name of an existing Nova key pair, installed for the image's default user on every instance."
  type        = string

  validation {
    condition     = length(var.key_pair) > 0
    error_message = "The key_pair must name an existing key pair."
  }
}

# ------------------------------------------------------------------------------------------ instances
variable "image_name" {
  description = "Glance image of every instance: a Debian 12 or Ubuntu 24.04 cloud image (Python >= 3.11, apt, cloud-init)."
  type        = string

  validation {
    condition     = length(var.image_name) > 0
    error_message = "The image_name must not be empty."
  }
}

variable "bastion_flavor" {
  description = "Flavor of the SSH bastion (the smallest there is will do)."
  type        = string
}

variable "api_flavor" {
  description = "Flavor of the API nodes: DuckDB runs sync and async queries there (memory_limit and threads per query in service_config_toml)."
  type        = string
}

variable "api_count" {
  description = "Number of API nodes behind the load balancer."
  type        = number
  default     = 2

  validation {
    condition     = var.api_count >= 1 && var.api_count <= 20 && floor(var.api_count) == var.api_count
    error_message = "The api_count must be a whole number from 1 to 20."
  }
}

variable "api_workers" {
  description = "uvicorn worker processes per API node (dac serve --workers); about one per two cores."
  type        = number
  default     = 2

  validation {
    condition     = var.api_workers >= 1 && var.api_workers <= 64 && floor(var.api_workers) == var.api_workers
    error_message = "The api_workers must be a whole number from 1 to 64."
  }
}

variable "api_port" {
  description = "TCP port dac serve listens on inside the private network (the load balancer's members)."
  type        = number
  default     = 8000

  validation {
    condition     = var.api_port >= 1024 && var.api_port <= 65535 && floor(var.api_port) == var.api_port
    error_message = "The api_port must be an unprivileged port, 1024-65535."
  }
}

variable "api_boot_volume_gb" {
  description = "Size of a boot volume for each API node, which also holds async job results (0: the flavor's own disk)."
  type        = number
  default     = 0

  validation {
    condition     = var.api_boot_volume_gb == 0 || (var.api_boot_volume_gb >= 20 && var.api_boot_volume_gb <= 4000)
    error_message = "The api_boot_volume_gb must be 0 (flavor disk) or 20-4000."
  }
}

variable "dask_scheduler_flavor" {
  description = "Flavor of the Dask scheduler (it holds the task graph, not the data: small)."
  type        = string
}

variable "dask_worker_flavor" {
  description = "Flavor of the Dask workers (DuckDB over their share of the partitions: cores and memory)."
  type        = string
}

variable "dask_worker_count" {
  description = "Number of Dask worker instances (one worker process each)."
  type        = number
  default     = 2

  validation {
    condition     = var.dask_worker_count >= 1 && var.dask_worker_count <= 200 && floor(var.dask_worker_count) == var.dask_worker_count
    error_message = "The dask_worker_count must be a whole number from 1 to 200."
  }
}

variable "dask_threads_per_worker" {
  description = "Threads of each Dask worker process (usually the flavor's vCPUs)."
  type        = number
  default     = 4

  validation {
    condition     = var.dask_threads_per_worker >= 1 && var.dask_threads_per_worker <= 256 && floor(var.dask_threads_per_worker) == var.dask_threads_per_worker
    error_message = "The dask_threads_per_worker must be a whole number from 1 to 256."
  }
}

variable "dask_address_env" {
  description = "Environment variable through which the API nodes learn the Dask scheduler's address (tcp://IP:8786) for big async queries ([service] dask_scheduler)."
  type        = string
  default     = "DAC_SERVICE_DASK_SCHEDULER"

  validation {
    condition     = can(regex("^[A-Z][A-Z0-9_]*$", var.dask_address_env))
    error_message = "The dask_address_env must be an upper-case environment variable name."
  }
}

# ------------------------------------------------------------------------------------------ the lake (Ceph RGW)
variable "s3_endpoint_url" {
  description = "URL of the existing Ceph RGW S3 endpoint of the cloud, e.g. https://s3.example.ac.uk (no path)."
  type        = string

  validation {
    condition     = can(regex("^https?://[A-Za-z0-9.-]+(:[0-9]+)?/?$", var.s3_endpoint_url))
    error_message = "The s3_endpoint_url must be http(s)://host[:port] with no path."
  }
}

variable "s3_region" {
  description = "S3 region name the RGW signs with (RGW's zonegroup; most accept us-east-1)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Bucket of the lake on the RGW."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name)) && !can(regex("\\.\\.", var.bucket_name))
    error_message = "The bucket_name must be a valid S3 bucket name: 3-63 lower-case letters, digits, '.' and '-'."
  }
}

variable "lake_prefix" {
  description = "Prefix of the lake inside the bucket (the lake URL is s3://BUCKET/PREFIX); empty for the bucket root."
  type        = string
  default     = "prod"

  validation {
    condition     = var.lake_prefix == "" || can(regex("^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$", var.lake_prefix))
    error_message = "The lake_prefix must be empty or path segments of lower-case letters, digits, '.', '_' and '-'."
  }
}

variable "create_bucket" {
  description = "Create the bucket (minio provider against the RGW). False when it exists already; `dac lake init` also creates it."
  type        = bool
  default     = true
}

variable "s3_access_key" {
  description = "Access key of an existing EC2/S3 credential for the lake. Null (default): one is made for the Terraform user with openstack_identity_ec2_credential_v3."
  type        = string
  default     = null
  sensitive   = true
}

variable "s3_secret_key" {
  description = "Secret key that goes with s3_access_key (give both or neither); pass it with TF_VAR_s3_secret_key, never in a .tfvars file."
  type        = string
  default     = null
  sensitive   = true
}

variable "deliver_lake_credentials" {
  description = "Write the S3 credentials into the root-only /etc/dac-lake/dac.env of each node through cloud-init (they then sit in the instances' user data and the Terraform state). False: the operator installs that file out of band."
  type        = bool
  default     = true
}

# ------------------------------------------------------------------------------------------ the service
variable "package_spec" {
  description = "What pip installs on every node: a wheel URL (\"dac-lake @ https://.../dac_lake-0.1.0-py3-none-any.whl\") or a git ref (\"git+https://github.com/ORG/dac-lake@v0.1.0\")."
  type        = string

  validation {
    # the install script single-quotes it: no quote, backslash or white space may break out
    condition     = can(regex("^[^\\s'\"`\\\\]+( @ [^\\s'\"`\\\\]+)?$", var.package_spec))
    error_message = "The package_spec must be one pip requirement without quotes, backslashes or spaces (except around ' @ ')."
  }
}

variable "extra_pip_packages" {
  description = "More requirements installed with the package on every node, in the same pip run (pin versions: the client, scheduler and workers must have the same dask/distributed)."
  type        = list(string)
  default     = ["distributed"]

  validation {
    condition     = alltrue([for p in var.extra_pip_packages : can(regex("^[^\\s'\"`\\\\]+$", p))])
    error_message = "Each of extra_pip_packages must be one requirement without spaces, quotes or backslashes."
  }
}

variable "pip_index_url" {
  description = "A PyPI mirror for the nodes (null: pypi.org)."
  type        = string
  default     = null

  validation {
    condition     = var.pip_index_url == null || can(regex("^https?://[^\\s'\"`\\\\]+$", var.pip_index_url))
    error_message = "The pip_index_url must be an http(s) URL."
  }
}

variable "service_config_toml" {
  description = "The non-secret dac.toml of the API nodes ([service] limits, [auth] with token hashes or OIDC settings). Secrets go in dac.env, never here."
  type        = string
  default     = <<-EOT
    [service]
    sync_timeout_s = 60
    async_workers = 2
    memory_limit = "4GB"
    threads = 2

    [auth]
    allow_anonymous = true
  EOT

  validation {
    condition     = !can(regex("(?i)(secret_access_key|password|client_secret)\\s*=", var.service_config_toml))
    error_message = "The service_config_toml must not carry secrets (S3 keys, passwords): they belong in /etc/dac-lake/dac.env."
  }
}

variable "extra_environment" {
  description = "More non-secret settings for /etc/dac-lake/dac.env of the API nodes and workers, e.g. { DAC_SERVICE_MAXREC_MAX = \"5000000\" }."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([
      for k, v in var.extra_environment : can(regex("^[A-Z_][A-Z0-9_]*$", k)) && !can(regex("[\\n\\r\"']", v))
    ])
    error_message = "The extra_environment keys must be upper-case variable names and values one line without quotes."
  }
}

# ------------------------------------------------------------------------------------------ the load balancer
variable "public_hostname" {
  description = "DNS name of the TAP service (matching the TLS certificate); null: the floating IP is used in URLs."
  type        = string
  default     = null

  validation {
    condition     = var.public_hostname == null || can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)+[a-z]{2,}$", var.public_hostname))
    error_message = "The public_hostname must be a lower-case DNS name."
  }
}

variable "tls_container_ref" {
  description = "Barbican certificate container (URL) for HTTPS on the load balancer; null: plain HTTP on port 80 (testing only)."
  type        = string
  default     = null

  validation {
    condition     = var.tls_container_ref == null || can(regex("^https?://", var.tls_container_ref))
    error_message = "The tls_container_ref must be the URL of a Barbican container."
  }
}

variable "lb_timeout_seconds" {
  description = "Idle timeout of client and member connections on the load balancer: longer than the sync query limit, as a result may start late and stream long."
  type        = number
  default     = 900

  validation {
    condition     = var.lb_timeout_seconds >= 60 && var.lb_timeout_seconds <= 86400
    error_message = "The lb_timeout_seconds must be from 60 to 86400."
  }
}
