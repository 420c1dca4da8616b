"""Scale-out: puyu engine replicas on Ray Serve behind one OpenAI-compatible ingress (`puyu serve --replicas N`).

routing.py (policies, no Ray), routers.py (them on Ray Serve's request-router hook), replica.py (the deployment
class and the stats board), remote.py (RayEngine: the EngineClient the API server runs on), deploy.py (Ray up, the
deployment's options), server.py (the ingress app: /health with replicas), cli.py (the flags), app.py (`serve run`
/ `serve deploy` entry point). Ray is an optional extra: nothing here imports it at module level but routers.py,
replica.py and app.py, which only Ray loads.
"""
