"""The read model: daily rollups and the queries the dashboard and reports share."""
