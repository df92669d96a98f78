variable "name_prefix" {
  description = "Prefix of the resource names."
  type        = string
}

variable "cidr" {
  description = "IPv4 CIDR of the private subnet."
  type        = string
}

variable "dns_nameservers" {
  description = "DNS servers for DHCP (empty: the cloud's default)."
  type        = list(string)
  default     = []
}

variable "external_network_name" {
  description = "External network for the router's gateway."
  type        = string
}
