"""The syncplane Kubernetes operator: kopf handlers over `workflows.syncplane.io`.

handlers.py registers the decorators and stays thin; builders.py and
observe.py are pure; reconciler.py drives the shared lifecycle core."""
