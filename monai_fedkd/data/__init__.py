"""Datasets, datalists, site partitioning and the site-side input transforms."""
