"""Mining: a failure report (frame, box, class) enters; the query object, a shortlist from the index and a
ranking by a named method (fused, regions, dtm, gem, rmac, discovery) leave, de-duplicated, with boxes and heat maps
(a review of the report's last mine, when there is one, teaches the query).
"""
