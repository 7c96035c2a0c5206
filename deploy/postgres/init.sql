-- Runs once, on the first start of an empty PostgreSQL data directory
-- (/docker-entrypoint-initdb.d), as POSTGRES_USER.
--
-- One database per service: no service can join another's tables, so the
-- only coupling between them stays the events on JetStream and the HTTP
-- APIs, and each service's Alembic history is independent.

CREATE DATABASE identity;
CREATE DATABASE homework;
CREATE DATABASE afterschool;
CREATE DATABASE institutions;
CREATE DATABASE funds;
-- The gateway keeps webhook subscriptions.
CREATE DATABASE gateway;

-- Nobody but the owner connects by default; a per-service role added later
-- gets CONNECT on its own database only.
REVOKE CONNECT ON DATABASE identity FROM PUBLIC;
REVOKE CONNECT ON DATABASE homework FROM PUBLIC;
REVOKE CONNECT ON DATABASE afterschool FROM PUBLIC;
REVOKE CONNECT ON DATABASE institutions FROM PUBLIC;
REVOKE CONNECT ON DATABASE funds FROM PUBLIC;
REVOKE CONNECT ON DATABASE gateway FROM PUBLIC;
