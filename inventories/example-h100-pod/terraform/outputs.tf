output "site" {
  description = "The site these nodes belong to."
  value       = var.site
}

output "racks" {
  description = "Per rack: its node names (sorted) and its GPU count, as recorded in state."
  value = {
    for rack, data in terraform_data.rack : rack => {
      nodes = data.output.nodes
      gpus  = data.output.gpus
    }
  }
}

output "nodes" {
  description = "Per node: rack, address, DNS name, BMC URL and GPUs."
  value       = local.nodes
}

output "inventory_total_gpus" {
  description = "GPUs in the whole inventory."
  value       = sum(concat([0], [for node in values(var.nodes) : node.gpu_count]))
}
