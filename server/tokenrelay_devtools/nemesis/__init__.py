"""A Jepsen-style nemesis for tokenrelay on Redis (issue 9): replicas and a
throwaway Redis (rig.py), faults on a seeded schedule (faults.py), clients
that drop and resume on random replicas (clients.py), and a pure checker
of what they saw against the logs in Redis (checker.py); runner.py plays
rounds of them.
"""
