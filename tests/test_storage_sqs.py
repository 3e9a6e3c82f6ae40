"""The SQS + DynamoDB adapter against the storage contract suite, on a moto server."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aws_fixtures
import pytest

from ojs_trio.storage.port import Storage
from ojs_trio.storage.sqs.adapter import SqsStorage
from ojs_trio.storage.sqs.client import AwsSettings
from ojs_trio.testing import CONTRACT_CHECKS, ContractCheck

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint
aws_settings = aws_fixtures.aws_settings


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=[c.__name__ for c in CONTRACT_CHECKS])
async def test_sqs_contract(check: ContractCheck, aws_settings: AwsSettings) -> None:
    @asynccontextmanager
    async def factory() -> AsyncIterator[Storage]:
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        await storage.open()
        try:
            await storage.reset()
            yield storage
        finally:
            await storage.aclose()

    await check(factory)
