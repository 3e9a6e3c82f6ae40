variable "region" {
  description = "AWS region of the table and the queues (the server's AWS_REGION)."
  type        = string
  default     = "us-east-1"
}

variable "table_name" {
  description = "DynamoDB job table (the server's DYNAMODB_TABLE)."
  type        = string
  default     = "ojs-jobs"
}

variable "queue_prefix" {
  description = "Prefix of every SQS queue name (the server's SQS_QUEUE_PREFIX)."
  type        = string
  default     = "ojs"

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]+$", var.queue_prefix))
    error_message = "queue_prefix may only contain letters, digits, '-' and '_'."
  }
}

variable "queues" {
  description = "OJS queues to create an SQS queue and a dead-letter queue for. Priority tier queues are created by the server when first needed."
  type        = list(string)
  default     = ["default"]

  validation {
    condition     = alltrue([for q in var.queues : can(regex("^[a-z0-9][a-z0-9.-]*$", q))])
    error_message = "OJS queue names match ^[a-z0-9][a-z0-9.-]*$."
  }
}

variable "use_fifo" {
  description = "Create FIFO queues (names end in .fifo; the server's SQS_USE_FIFO)."
  type        = bool
  default     = false
}

variable "max_receive_count" {
  description = "Receives after which SQS moves a message to the -dlq queue (the server's SQS_MAX_RECEIVE_COUNT)."
  type        = number
  default     = 5

  validation {
    condition     = var.max_receive_count >= 1 && var.max_receive_count <= 1000
    error_message = "max_receive_count must be between 1 and 1000."
  }
}

variable "iam_policy_name" {
  description = "Name of the IAM policy for the server's role or user."
  type        = string
  default     = "ojs-trio-server"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
