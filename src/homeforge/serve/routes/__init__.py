"""One router per endpoint family; ``create_app`` includes them all."""

from homeforge.serve.routes import classifications, embeddings, feedback, generate, health, models

ROUTERS = [health.router, models.router, generate.router, embeddings.router, classifications.router,
           feedback.router]
