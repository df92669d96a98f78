variable "name_prefix" {
  description = "Prefix of the resource names."
  type        = string
}

variable "node_count" {
  description = "Number of API nodes."
  type        = number
}

variable "flavor" {
  description = "Flavor of the API nodes."
  type        = string
}

variable "image_name" {
  description = "Image of the API nodes (Debian 12 / Ubuntu 24.04)."
  type        = string
}

variable "key_pair" {
  description = "Nova key pair for the image's default user."
  type        = string
}

variable "boot_volume_gb" {
  description = "Boot volume size in GB (0: boot from the flavor's disk)."
  type        = number
  default     = 0
}

variable "network_id" {
  description = "Private network."
  type        = string
}

variable "subnet_id" {
  description = "Private subnet (nodes, VIP and members)."
  type        = string
}

variable "node_security_group_ids" {
  description = "Security groups of the API nodes' ports."
  type        = list(string)
}

variable "lb_security_group_ids" {
  description = "Security groups of the load balancer's VIP port."
  type        = list(string)
}

variable "api_port" {
  description = "Port of dac serve on the nodes."
  type        = number
}

variable "floating_ip" {
  description = "Floating IP address to put on the load balancer's VIP."
  type        = string
}

variable "public_host" {
  description = "Host name (or the floating IP) clients use: the HTTP listener redirects to https://this."
  type        = string
}

variable "tls_container_ref" {
  description = "Barbican certificate container for the HTTPS listener (null: HTTP only)."
  type        = string
  default     = null
}

variable "lb_timeout_seconds" {
  description = "Client and member data timeouts of the listeners."
  type        = number
  default     = 900
}

variable "install_script" {
  description = "Shell script that installs dac-lake into /opt/dac-lake (templates/install.sh.tftpl, rendered)."
  type        = string
}

variable "service_unit" {
  description = "Text of the systemd unit of dac serve (deploy/dac-serve.service)."
  type        = string
}

variable "service_config_toml" {
  description = "Non-secret /etc/dac-lake/dac.toml."
  type        = string
}

variable "environment" {
  description = "Lines of the root-only /etc/dac-lake/dac.env (lake URL, S3 keys, DAC_* settings)."
  type        = map(string)
  sensitive   = true
}
