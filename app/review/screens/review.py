"""The review page of the review UI (drawn by `app.review.views.review_page`)."""
from app.review import views

views.review_page()
