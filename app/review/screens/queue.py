"""The queue page of the review UI (drawn by `app.review.views.queue_page`)."""
from app.review import views

views.queue_page()
