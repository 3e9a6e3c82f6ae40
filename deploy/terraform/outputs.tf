output "table_name" {
  description = "DynamoDB job table name."
  value       = aws_dynamodb_table.jobs.name
}

output "table_arn" {
  description = "DynamoDB job table ARN."
  value       = aws_dynamodb_table.jobs.arn
}

output "queue_urls" {
  description = "OJS queue name => SQS queue URL."
  value       = { for q, queue in aws_sqs_queue.main : q => queue.url }
}

output "queue_arns" {
  description = "OJS queue name => SQS queue ARN."
  value       = { for q, queue in aws_sqs_queue.main : q => queue.arn }
}

output "dlq_urls" {
  description = "OJS queue name => SQS dead-letter queue URL."
  value       = { for q, queue in aws_sqs_queue.dlq : q => queue.url }
}

output "dlq_arns" {
  description = "OJS queue name => SQS dead-letter queue ARN."
  value       = { for q, queue in aws_sqs_queue.dlq : q => queue.arn }
}

output "iam_policy_arn" {
  description = "ARN of the server policy; attach it to the server's role or user."
  value       = aws_iam_policy.server.arn
}

output "iam_policy_json" {
  description = "The server policy document, to attach elsewhere (e.g. as an inline policy)."
  value       = data.aws_iam_policy_document.server.json
}

output "storage_url" {
  description = "The --storage / OJS_STORAGE URL that matches these resources."
  value       = "sqs://${var.region}/${var.table_name}?prefix=${var.queue_prefix}&fifo=${var.use_fifo}&max_receive_count=${var.max_receive_count}"
}
