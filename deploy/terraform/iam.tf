# What the server needs at run time, and nothing else. The SQS statement covers every
# queue under the prefix: the server creates priority tier queues ({prefix}-{queue}-p{n},
# -n{n}) and queues of OJS queues not provisioned here when a job first needs them.

data "aws_iam_policy_document" "server" {
  statement {
    sid    = "JobTable"
    effect = "Allow"
    actions = [
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:DeleteItem",
      "dynamodb:Query",
      "dynamodb:Scan",
      "dynamodb:BatchGetItem",
      "dynamodb:BatchWriteItem",
      "dynamodb:TransactWriteItems",
      "dynamodb:TransactGetItems",
      "dynamodb:DescribeTable",
      "dynamodb:DescribeTimeToLive",
    ]
    resources = [
      aws_dynamodb_table.jobs.arn,
      "${aws_dynamodb_table.jobs.arn}/index/*",
    ]
  }

  statement {
    sid    = "JobQueues"
    effect = "Allow"
    actions = [
      "sqs:SendMessage",
      "sqs:SendMessageBatch",
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:DeleteMessageBatch",
      "sqs:ChangeMessageVisibility",
      "sqs:ChangeMessageVisibilityBatch",
      "sqs:GetQueueUrl",
      "sqs:GetQueueAttributes",
      "sqs:SetQueueAttributes",
      "sqs:CreateQueue",
      "sqs:PurgeQueue",
    ]
    resources = [
      "arn:${data.aws_partition.current.partition}:sqs:${var.region}:${data.aws_caller_identity.current.account_id}:${var.queue_prefix}-*",
    ]
  }
}

resource "aws_iam_policy" "server" {
  name        = var.iam_policy_name
  description = "ojs-trio server: DynamoDB table ${var.table_name} and SQS queues ${var.queue_prefix}-*"
  policy      = data.aws_iam_policy_document.server.json
  tags        = var.tags
}
