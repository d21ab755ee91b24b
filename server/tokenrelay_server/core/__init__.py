"""The pure core: types, errors, classification, the recovery decision, retry
timing, the circuit breaker, the stitcher, and the `Clock` everything waits
on. Nothing here does I/O or imports from the layers above."""
