from chassis.messaging import messaging_metadata
from chassis.migrations import run_env
from services.institutions.models import Base

run_env([messaging_metadata, Base.metadata])
