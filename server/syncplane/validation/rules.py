"""The vendors' limits and naming rules (../shared/DOMAIN.md), in one place."""

import re

MAX_CUSTOM_ENTITIES = 20
MAX_COLUMNS_PER_ENTITY = 50
MAX_BATCH_SIZE = 1000          # Dataverse $batch: at most 1,000 requests
DEFAULT_BATCH_SIZE = 100
MIN_POLL_SECONDS = 1
MAX_POLL_SECONDS = 3600
DEFAULT_POLL_SECONDS = 5
MAX_WORKERS = 16
# Requests in flight per connection (spec.source/destination.max_concurrency). Dataverse allows
# 52 concurrent requests per user ("Service protection API limits", Microsoft Learn,
# learn.microsoft.com/power-apps/developer/data-platform/api-limits: "Number of concurrent
# requests"); Campaign Standard publishes no limit: 256 bounds what one worker attempts.
MAX_CONCURRENCY_DYNAMICS365 = 52
MAX_CONCURRENCY_CAMPAIGN = 256
# What 0 (unset) means. Measured 2026-11-29 (issue 18), worker steady records/s by destination
# concurrency, 4,000 contacts, two rounds, each against a bare writer at the same concurrency in the same
# run (bench_ingress._worker_run and _bare, driven per concurrency; `python -m benchmarks --only ingress
# --only ingress_latency` runs the fixed set): at 20 ms, 8: 50/42, 16: 72/88, 32: 56/81, 52: 78/75 rec/s
# (bare writer 97/99, 70/145, 95/137, 147/156); at 0 ms (one round), 8: 59, 16: 63, 52: 81 rec/s (bare 81,
# 158, 140). The machine ran at a load average of 17-28 on 2 cores (normal:
# ~7,000 rec/s at 0 ms), so every run was CPU-starved and no concurrency beat 16 beyond the noise: the
# default stays 16, to be measured again on a quiet machine (the earlier bare writers at 52 and
# 128 in flight were 2.4-2.6x faster at 20 ms). AIMD lowers it on 429s or rising latency either way.
DEFAULT_MAX_CONCURRENCY = 16
# Campaign Standard's default, measured again 2026-11-30 on a quiet machine (load 0.8-2.5):
# `python -m benchmarks --only ingress_latency`, 20 ms per request, worker records/s at 16 / 52 / 128 in
# flight: 551 / 718 / 975 (bare writer 538 / 1,062 / 1,264, capped by 2 cores running the sandbox too).
# 52 writes 1.30x the records of 16, and the gain grows with real latency (a per-record POST: Campaign
# has no bulk write). 52 and not 128: Campaign publishes no limit (DOMAIN.md: "honour 429/Retry-After
# and cap concurrency"), so the default stays at the one documented figure of the two vendors rather
# than at the highest measured; AIMD halves it on a 429 or rising latency. Dataverse keeps 16, a third of
# its per-user limit of 52, since other applications often share the integration's application user.
DEFAULT_MAX_CONCURRENCY_CAMPAIGN = 52
MAX_REPLAY_ROWS = 2_000_000     # a replay is refused at this backlog or table size
PROFILE_RESOURCE = "profile"

CAMPAIGN_OPT_OUT_FIELDS = frozenset({
    "blackList", "blackListEmail", "blackListFax", "blackListMobile", "blackListPhone",
    "blackListPostalMail", "blackListPushnotification", "ccpaOptOut",
})
CRM_OPT_OUT_FIELD = re.compile(r"^donot[a-z]+$")
# Dataverse logical names are lowercase; Campaign names are camelCase.
CRM_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,127}$")
CAMPAIGN_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

# A query parameter of an endpoint whose name holds one of these (any case) looks like a
# credential (`client_secret`, `access_token`, `api-key`, `sig` of a SAS URL, `X-Amz-Credential`):
# it is refused, so that no secret is written into a spec (and from there into the CR, its
# last-applied annotation, `describe` and events). Credentials go in the referenced secret.
SECRET_QUERY_WORDS = ("secret", "passw", "pwd", "token", "key", "sig", "credential", "auth")
# One pattern over the whole endpoint, for validation (re.search) and the CRD (CEL matches(), RE2,
# cheap enough for the API server's cost budget, which parsing the query into a map is not):
# the name of a query parameter (up to its '=') that holds one of the words. Group 1 is the name.
SECRET_QUERY = re.compile(r"^[^?#]*\?(?:[^#]*&)?([^=&#]*(?i:" + "|".join(SECRET_QUERY_WORDS) + r")[^=&#]*)")
