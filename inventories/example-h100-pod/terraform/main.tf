# An example module for the example H100 pod that needs no provider at all (it runs offline):
# it groups the nodes by rack and keeps one terraform_data resource per rack, so a change to
# a rack's membership or GPUs shows up in `provisioner apply`'s plan. A real site replaces
# this with its own module (DNS records, IPAM entries, load balancers ...) reading the same
# variables; see README.md.

terraform {
  required_version = ">= 1.9"
  # No backend block: state is local (terraform.tfstate here). With `backend: {type: pg}`
  # in the spec, provisioner writes provisioner_backend_override.tf.json next to this file.
}

locals {
  domain = var.provisioning_network.domain

  racks = sort(distinct([for node in values(var.nodes) : node.rack]))

  rack_nodes = {
    for rack in local.racks :
    rack => sort([for name, node in var.nodes : name if node.rack == rack])
  }

  rack_gpus = {
    for rack in local.racks :
    rack => sum(concat([0], [for node in values(var.nodes) : node.gpu_count if node.rack == rack]))
  }

  nodes = {
    for name, node in var.nodes : name => {
      rack      = node.rack
      ip        = node.ip
      mac       = node.mac
      dns_name  = local.domain == null ? name : "${name}.${local.domain}"
      bmc       = "${node.bmc_protocol}://${node.bmc_host}:${node.bmc_port}"
      serial    = node.serial
      profile   = node.profile
      gpu_sku   = node.gpu_sku
      gpu_count = node.gpu_count
    }
  }
}

resource "terraform_data" "rack" {
  for_each = local.rack_nodes

  input = {
    site  = var.site
    rack  = each.key
    nodes = each.value
    gpus  = local.rack_gpus[each.key]
  }
}
