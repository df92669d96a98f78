variable "name_prefix" {
  description = "Prefix of the resource names."
  type        = string
}

variable "scheduler_flavor" {
  description = "Flavor of the scheduler."
  type        = string
}

variable "worker_flavor" {
  description = "Flavor of the workers."
  type        = string
}

variable "worker_count" {
  description = "Number of worker instances."
  type        = number
}

variable "threads_per_worker" {
  description = "Threads of each worker process."
  type        = number
}

variable "image_name" {
  description = "Image of the scheduler and workers."
  type        = string
}

variable "key_pair" {
  description = "Nova key pair for the image's default user."
  type        = string
}

variable "network_id" {
  description = "Private network."
  type        = string
}

variable "subnet_id" {
  description = "Private subnet."
  type        = string
}

variable "security_group_ids" {
  description = "Security groups of the scheduler's and workers' ports."
  type        = list(string)
}

variable "ports" {
  description = "Dask ports: scheduler, dashboard, worker and nanny ranges (\"min:max\")."
  type = object({
    scheduler = number
    dashboard = number
    workers   = string
    nannies   = string
    range_min = number
    range_max = number
  })
}

variable "install_script" {
  description = "Shell script that installs dac-lake (and distributed) into /opt/dac-lake."
  type        = string
}

variable "lake_environment" {
  description = "Lake settings and S3 keys for the workers' root-only /etc/dac-lake/dac.env."
  type        = map(string)
  sensitive   = true
}

variable "scheduler_unit" {
  description = "Text of deploy/dask-scheduler.service."
  type        = string
}

variable "worker_unit" {
  description = "Text of deploy/dask-worker.service."
  type        = string
}
