variable "name_prefix" {
  description = "Prefix of the security group names."
  type        = string
}

variable "subnet_cidr" {
  description = "CIDR of the private subnet: the load balancer's amphorae and health checks come from there."
  type        = string
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH to the bastion."
  type        = list(string)
}

variable "client_cidrs" {
  description = "CIDRs allowed to reach the load balancer's listeners."
  type        = list(string)
}

variable "metrics_cidrs" {
  description = "CIDRs outside the subnet allowed to scrape /metrics on the API nodes."
  type        = list(string)
  default     = []
}

variable "api_port" {
  description = "Port of dac serve on the API nodes."
  type        = number
}

variable "https" {
  description = "Whether the load balancer listens on 443 (TLS) as well as 80."
  type        = bool
}

variable "dask_ports" {
  description = "Dask ports: scheduler, dashboard, and the worker/nanny range (range_min..range_max)."
  type = object({
    scheduler = number
    dashboard = number
    workers   = string
    nannies   = string
    range_min = number
    range_max = number
  })
}
