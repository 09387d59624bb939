"""The operator's dashboard: a read-only live page of a job (rounds, held-out metrics as a plot,
devices, refusals), served with aiohttp beside the coordinator or on its own, behind an operator
token; or written as one static HTML file. See docs/dashboard.md."""
