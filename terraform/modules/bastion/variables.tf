variable "name_prefix" {
  description = "Prefix of the resource names."
  type        = string
}

variable "flavor" {
  description = "Flavor of the bastion."
  type        = string
}

variable "image_name" {
  description = "Image of the bastion."
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
  description = "Security groups of the bastion's port."
  type        = list(string)
}

variable "external_network_name" {
  description = "Pool of the bastion's floating IP."
  type        = string
}
