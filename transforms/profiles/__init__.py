"""Learner behaviour profiles, kept current from the stream; see README "Learner profiles".

profile.py: the state of one profile and how an event changes it (pure Python);
update.py: UpdateProfiles, the DoFn that keeps them in Postgres and Redis,
exact across restarts, and emits the fast-answers rule's AlertSignals.
"""
