"""Where queued jobs run: the local worker (jobs/worker.py, one job at a time in its own process) or a Ray cluster
(ray_dispatch.py: one Ray task per job, the dispatcher the store's only writer). Ray is imported only here."""
