"""Multi-resolution methods: fusion operators (and, later, estimators and batch mixers)."""
