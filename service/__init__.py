"""The analytics service: HTTP beside the streaming job (health, status, Prometheus metrics, replay).

``pipelines.streaming`` starts it (service/server.py) before the pipeline runs
and stops it after the job ended; everything it reports comes from the running
job (service/job_metrics.py: the runner's job service) and from the services
themselves (Kafka offsets, Redis, Postgres).
"""
