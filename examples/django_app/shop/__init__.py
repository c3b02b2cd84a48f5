"""A Django shop that defers a job in the same transaction as the order it creates."""
