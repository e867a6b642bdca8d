# Bake prepull and the images of a manifest into an EKS node AMI with Packer,
# the way amazon-eks-ami builds its AMIs (amazon-ebs builder + provisioners).
#
# Standalone:
#   packer init deploy/packer && packer build \
#     -var prepull_binary=dist/prepull-linux-amd64 \
#     -var manifest=deploy/examples/general-node.yaml deploy/packer
# Or copy the three provisioners of the build block into your own template
# (amazon-eks-ami: after its own provisioners, before the clean-up one).
#
# The instance profile (iam_instance_profile) needs
# AmazonEC2ContainerRegistryReadOnly for ECR images; prepull gets its ECR
# token through IMDS like kubelet does.

packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type    = string
  default = "us-west-2"
}

variable "kubernetes_version" {
  type    = string
  default = "1.32"
}

variable "instance_type" {
  type    = string
  default = "m6i.large"
}

variable "iam_instance_profile" {
  type        = string
  description = "Instance profile with AmazonEC2ContainerRegistryReadOnly (and AmazonSSMManagedInstanceCore if you use SSM)."
}

variable "prepull_binary" {
  type        = string
  description = "Local path of the prepull binary for the AMI's architecture."
}

variable "prepull_binary_sha256" {
  type        = string
  default     = ""
  description = "Expected sha256 of the binary; checked on the instance when set."
}

variable "manifest" {
  type        = string
  default     = "deploy/examples/general-node.yaml"
  description = "Local path of the prepull manifest to bake."
}

variable "concurrency" {
  type    = number
  default = 4
}

variable "enable_daemon" {
  type    = bool
  default = false
}

variable "volume_size" {
  type        = number
  default     = 40
  description = "Root volume GiB: the pre-pulled images live on it."
}

locals {
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
}

source "amazon-ebs" "eks" {
  region               = var.region
  instance_type        = var.instance_type
  iam_instance_profile = var.iam_instance_profile
  ssh_username         = "ec2-user"
  ami_name             = "eks-${var.kubernetes_version}-prepull-${local.timestamp}"

  # Start from the EKS-optimized Amazon Linux 2023 AMI (containerd, nodeadm).
  source_ami_filter {
    filters = {
      name                = "amazon-eks-node-al2023-x86_64-standard-${var.kubernetes_version}-*"
      virtualization-type = "hvm"
    }
    owners      = ["602401143452"]
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.volume_size
    volume_type           = "gp3"
    delete_on_termination = true
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2, which prepull uses
    http_put_response_hop_limit = 2
  }
}

build {
  sources = ["source.amazon-ebs.eks"]

  provisioner "file" {
    source      = var.prepull_binary
    destination = "/tmp/prepull"
  }

  provisioner "file" {
    source      = var.manifest
    destination = "/tmp/prepull-manifest.yaml"
  }

  # Installs prepull and its units, enables prepull.service (first-boot
  # warm-up), starts containerd if needed, `prepull run` + `prepull verify`,
  # stops containerd again.
  provisioner "shell" {
    script          = "${path.root}/prepull-build.sh"
    execute_command = "chmod +x {{ .Path }}; sudo -E env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars = [
      "PREPULL_BINARY_SRC=/tmp/prepull",
      "PREPULL_BINARY_SHA256=${var.prepull_binary_sha256}",
      "PREPULL_MANIFEST_SRC=/tmp/prepull-manifest.yaml",
      "PREPULL_ENABLE_DAEMON=${var.enable_daemon}",
      "PREPULL_CONCURRENCY=${var.concurrency}",
      "PREPULL_TIMEOUT=50m",
    ]
  }
}
