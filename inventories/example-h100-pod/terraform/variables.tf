# Inputs: exactly what `provisioner apply` writes to terraform.tfvars.json
# (provisioner.render.tree.tfvars): the site, the provisioning network and every node's facts.
# No credentials are ever in them.

variable "site" {
  description = "Site name from the fleet spec's metadata.site."
  type        = string
}

variable "provisioning_network" {
  description = "The provisioning network: cidr, gateway and DNS domain (domain may be null)."
  type = object({
    cidr    = string
    gateway = string
    domain  = string
  })

  validation {
    condition     = can(cidrhost(var.provisioning_network.cidr, 0))
    error_message = "provisioning_network.cidr must be an IPv4 network such as 10.40.0.0/20."
  }
}

variable "nodes" {
  description = "Node facts by host name."
  type = map(object({
    rack         = string
    ip           = string
    mac          = string
    bmc_protocol = string
    bmc_host     = string
    bmc_port     = number
    serial       = string # null when the spec gives none
    profile      = string
    stack        = string
    image        = string
    gpu_sku      = string
    gpu_count    = number
  }))

  # Every node address lies in the provisioning network: the network part of "IP/prefix"
  # equals the network's own. (Referring to another variable here needs Terraform >= 1.9.)
  validation {
    condition = alltrue([
      for node in values(var.nodes) :
      cidrhost("${node.ip}/${split("/", var.provisioning_network.cidr)[1]}", 0) == cidrhost(var.provisioning_network.cidr, 0)
    ])
    error_message = "Nodes outside provisioning_network.cidr (${var.provisioning_network.cidr}): ${join(", ", sort([for name, node in var.nodes : name if cidrhost("${node.ip}/${split("/", var.provisioning_network.cidr)[1]}", 0) != cidrhost(var.provisioning_network.cidr, 0)]))}."
  }
}
