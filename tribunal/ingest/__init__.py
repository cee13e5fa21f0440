"""Taking items in over HTTP: ``tribunal serve``, the endpoint help desks push tickets to."""
