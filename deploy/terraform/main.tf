# The same resources as `ojs-trio aws provision` (ojs_trio/storage/sqs/provision.py):
# one DynamoDB table with three global secondary indexes and TTL, and for each OJS
# queue an SQS queue that redrives to its own dead-letter queue.

provider "aws" {
  region = var.region
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  # SQS keeps messages at most 14 days; the server relies on the maximum.
  message_retention_seconds = 1209600

  fifo_suffix = var.use_fifo ? ".fifo" : ""

  # OJS queue name => SQS name part. SQS forbids '.', OJS queue names cannot hold '_'.
  queues = { for q in distinct(var.queues) : q => replace(q, ".", "_") }

  # String key attributes: the primary key and the keys of the three GSIs.
  key_attributes = ["pk", "sk", "gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk", "gsi3pk", "gsi3sk"]

  indexes = {
    "by-queue-state" = ["gsi1pk", "gsi1sk"]
    "dead-letter"    = ["gsi2pk", "gsi2sk"]
    "by-expiry"      = ["gsi3pk", "gsi3sk"]
  }
}

resource "aws_dynamodb_table" "jobs" {
  name         = var.table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "pk"
  range_key    = "sk"

  dynamic "attribute" {
    for_each = local.key_attributes
    content {
      name = attribute.value
      type = "S"
    }
  }

  dynamic "global_secondary_index" {
    for_each = local.indexes
    content {
      name            = global_secondary_index.key
      hash_key        = global_secondary_index.value[0]
      range_key       = global_secondary_index.value[1]
      projection_type = "ALL"
    }
  }

  ttl {
    attribute_name = "expires_at_ttl"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  tags = var.tags
}

resource "aws_sqs_queue" "dlq" {
  for_each = local.queues

  name                      = "${var.queue_prefix}-${each.value}-dlq${local.fifo_suffix}"
  fifo_queue                = var.use_fifo
  message_retention_seconds = local.message_retention_seconds
  tags                      = var.tags

  lifecycle {
    precondition {
      condition     = length("${var.queue_prefix}-${each.value}-dlq${local.fifo_suffix}") <= 80
      error_message = "The SQS names of queue \"${each.key}\" would exceed 80 characters; ojs-trio shortens such names with a hash, so provision it with `ojs-trio aws provision` or use a shorter prefix or queue name."
    }
  }
}

resource "aws_sqs_queue" "main" {
  for_each = local.queues

  name                      = "${var.queue_prefix}-${each.value}${local.fifo_suffix}"
  fifo_queue                = var.use_fifo
  message_retention_seconds = local.message_retention_seconds
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq[each.key].arn
    maxReceiveCount     = var.max_receive_count
  })
  tags = var.tags
}
