from chassis.messaging import messaging_metadata
from chassis.migrations import run_env
from gateway.webhooks.models import metadata

run_env([messaging_metadata, metadata])
